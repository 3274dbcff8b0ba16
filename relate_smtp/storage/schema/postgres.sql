-- The Relate tables the SMTP host reads and writes (SPEC §8), as the platform's EF Core
-- migrations create them with the Npgsql provider: quoted PascalCase names, EF's
-- constraint and index names ("PK_Users", "FK_<Dependent>_<Principal>_<Column>",
-- "IX_<Table>_<Columns>"), and the column types Npgsql maps the entity properties to.
--
-- Run by `relate-smtp db init`. Every statement is IF NOT EXISTS: on a database the
-- platform already created, nothing is dropped or altered, so the platform's own
-- migrations stay in charge of its schema. No extra indexes are added for the same
-- reason (see postgres.py for how the queries live with EF's indexes).

CREATE TABLE IF NOT EXISTS "Users" (
    "Id" uuid NOT NULL,
    "OidcSubject" character varying(500) NOT NULL,
    "OidcIssuer" character varying(500) NOT NULL,
    "Email" character varying(320) NOT NULL,
    "DisplayName" character varying(500) NULL,
    "CreatedAt" timestamp with time zone NOT NULL,
    "LastLoginAt" timestamp with time zone NULL,
    CONSTRAINT "PK_Users" PRIMARY KEY ("Id")
);

CREATE INDEX IF NOT EXISTS "IX_Users_Email" ON "Users" ("Email");
CREATE UNIQUE INDEX IF NOT EXISTS "IX_Users_OidcIssuer_OidcSubject"
    ON "Users" ("OidcIssuer", "OidcSubject");

CREATE TABLE IF NOT EXISTS "UserEmailAddresses" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Address" character varying(320) NOT NULL,
    "IsVerified" boolean NOT NULL,
    "AddedAt" timestamp with time zone NOT NULL,
    "VerificationToken" character varying NULL,
    "VerificationTokenExpiresAt" timestamp with time zone NULL,
    CONSTRAINT "PK_UserEmailAddresses" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_UserEmailAddresses_Users_UserId" FOREIGN KEY ("UserId")
        REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS "IX_UserEmailAddresses_UserId" ON "UserEmailAddresses" ("UserId");

CREATE TABLE IF NOT EXISTS "SmtpApiKeys" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Name" character varying(100) NOT NULL,
    "KeyHash" character varying(128) NOT NULL,
    "KeyPrefix" character varying NULL,
    "Scopes" character varying(500) NOT NULL DEFAULT '[]',
    "CreatedAt" timestamp with time zone NOT NULL,
    "LastUsedAt" timestamp with time zone NULL,
    "RevokedAt" timestamp with time zone NULL,
    CONSTRAINT "PK_SmtpApiKeys" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_SmtpApiKeys_Users_UserId" FOREIGN KEY ("UserId")
        REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS "IX_SmtpApiKeys_UserId" ON "SmtpApiKeys" ("UserId");
CREATE INDEX IF NOT EXISTS "IX_SmtpApiKeys_RevokedAt" ON "SmtpApiKeys" ("RevokedAt");
CREATE INDEX IF NOT EXISTS "IX_SmtpApiKeys_KeyPrefix_RevokedAt"
    ON "SmtpApiKeys" ("KeyPrefix", "RevokedAt");

CREATE TABLE IF NOT EXISTS "Emails" (
    "Id" uuid NOT NULL,
    "MessageId" character varying(500) NOT NULL,
    "FromAddress" character varying(320) NOT NULL,
    "FromDisplayName" character varying(500) NULL,
    "Subject" character varying(1000) NOT NULL,
    "TextBody" text NULL,
    "HtmlBody" text NULL,
    "ReceivedAt" timestamp with time zone NOT NULL,
    "SizeBytes" bigint NOT NULL,
    "InReplyTo" character varying(500) NULL,
    "References" character varying(2000) NULL,
    "ThreadId" uuid NULL,
    "SentByUserId" uuid NULL,
    CONSTRAINT "PK_Emails" PRIMARY KEY ("Id")
);

CREATE INDEX IF NOT EXISTS "IX_Emails_MessageId" ON "Emails" ("MessageId");
CREATE INDEX IF NOT EXISTS "IX_Emails_ReceivedAt" ON "Emails" ("ReceivedAt");
CREATE INDEX IF NOT EXISTS "IX_Emails_ThreadId" ON "Emails" ("ThreadId");

CREATE TABLE IF NOT EXISTS "EmailRecipients" (
    "Id" uuid NOT NULL,
    "EmailId" uuid NOT NULL,
    "Address" character varying(320) NOT NULL,
    "DisplayName" character varying(500) NULL,
    "Type" character varying(10) NOT NULL,
    "UserId" uuid NULL,
    "IsRead" boolean NOT NULL,
    CONSTRAINT "PK_EmailRecipients" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_EmailRecipients_Emails_EmailId" FOREIGN KEY ("EmailId")
        REFERENCES "Emails" ("Id") ON DELETE CASCADE,
    CONSTRAINT "FK_EmailRecipients_Users_UserId" FOREIGN KEY ("UserId")
        REFERENCES "Users" ("Id") ON DELETE SET NULL
);

CREATE INDEX IF NOT EXISTS "IX_EmailRecipients_Address" ON "EmailRecipients" ("Address");
CREATE INDEX IF NOT EXISTS "IX_EmailRecipients_EmailId" ON "EmailRecipients" ("EmailId");
CREATE INDEX IF NOT EXISTS "IX_EmailRecipients_UserId_IsRead"
    ON "EmailRecipients" ("UserId", "IsRead");

CREATE TABLE IF NOT EXISTS "EmailAttachments" (
    "Id" uuid NOT NULL,
    "EmailId" uuid NOT NULL,
    "FileName" character varying(500) NOT NULL,
    "ContentType" character varying(200) NOT NULL,
    "SizeBytes" bigint NOT NULL,
    "Content" bytea NOT NULL,
    CONSTRAINT "PK_EmailAttachments" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_EmailAttachments_Emails_EmailId" FOREIGN KEY ("EmailId")
        REFERENCES "Emails" ("Id") ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS "IX_EmailAttachments_EmailId" ON "EmailAttachments" ("EmailId");
